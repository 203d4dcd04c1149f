"""Model boundaries that stages share (``ModelHandler``s for ``RunInference`` and what they load).

Modules here import their model libraries lazily (in ``load_model``), so importing one costs nothing.
"""
