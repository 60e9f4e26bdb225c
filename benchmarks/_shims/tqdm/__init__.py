"""A do-nothing stand-in for tqdm, put on PYTHONPATH by gpu_suite.sh ONLY when the real tqdm is not
installed (jaxlin.gram imports ``tqdm.auto.tqdm`` for its progress bar; the benchmarks never show it)."""


class tqdm:  # noqa: N801 - the real name
    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable or ())

    def update(self, n=1):
        pass

    def close(self):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
