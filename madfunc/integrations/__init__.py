"""Integrations with training frameworks: each module imports its framework, so ``import madfunc`` never does.

``madfunc.integrations.transformers``: :class:`~madfunc.integrations.transformers.PlanTrainer`, HuggingFace's
``Trainer`` running a madfunc plan (and, optionally, the seed-fused :class:`~madfunc.SeedSGD`). Open this
package to add a framework: one module per framework, built on the public API only.
"""
