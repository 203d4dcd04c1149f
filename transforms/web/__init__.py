"""Network and format boundaries of the web front end: HTML image extraction, WARC reading, the polite fetcher.

Nothing here imports Beam: the stages that drive these modules are ``transforms/extract.py`` (WARC pages) and
``transforms/fetch.py`` (image bytes for pairs that have none).
"""
