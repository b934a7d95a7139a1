"""Workers: where candidates are merged and scored. The pool protocol and its in-process and
Ray pools, one evaluator (sources on its device, a live model merged in place, lm-eval
scoring), the memory model a worker is sized by, and how sources are shipped to it."""
