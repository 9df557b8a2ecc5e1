"""``python -m anllm.lm_eval ARGS``: lm-eval's CLI with the ``anllm`` model registered (see :mod:`anllm.lm_eval`)."""

from anllm.lm_eval import main

if __name__ == "__main__":
    main()
