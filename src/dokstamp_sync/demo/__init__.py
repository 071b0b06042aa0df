"""The demo on embedded defaults (:mod:`.runner`), the one-certificate walkthrough, and the
sample data they and the benchmark use."""
