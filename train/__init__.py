"""Training scripts (``python -m train.<script>``); each exposes ``main(argv=None) -> int``."""
