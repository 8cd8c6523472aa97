"""Retrieval-augmented generation on top of gpurag's retrievers; heavy libraries load lazily."""
