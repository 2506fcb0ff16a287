"""``python -m mpo_exp.report <sweep dir>``."""

from mpo_exp.report import main

main()
