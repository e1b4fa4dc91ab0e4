"""The bottom layer: imports nothing of madfunc outside itself.

``checks.py`` (what every segment call is checked for, and the messages that say what to do),
``guards.py`` (cost guards, ``PerformanceWarning``), ``functorch.py`` (the one home of PyTorch's private
functorch API), ``autocast.py`` and ``registry.py`` (the one owner of process-wide state).
"""
