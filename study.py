"""The anchor-learning study: ``python study.py [study=cpu|gpu|tiny] [overrides]`` (``make study``).

Runs from the repository root; see conf/study.yaml and src/anllm/study/. Every stage resumes, so
re-running the same command after an interruption continues where it stopped. The config (and the
training config of every arm it names) is typed and checked first: bad input exits with code 2 and
one line naming the key, before anything is written (:mod:`anllm.cli`).
"""

import sys

from anllm.study.runner import main

if __name__ == "__main__":
    main(sys.argv[1:])
