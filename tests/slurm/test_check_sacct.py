"""The sacct checker of the SLURM test, on hand-written logs and a fake sacct (no Slurm)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "check_sacct", Path(__file__).with_name("check_sacct.py")
)
check_sacct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_sacct)

# The shape of `snakemake -n` output (Snakemake 9): the table comes twice.
DRY = """Building DAG of jobs...
Job stats:
job          count
---------  -------
train            2
table_t1         1
all              1
total            4

rule train:
Job stats:
job          count
---------  -------
train            2
"""

LOGDIR = "/w/.snakemake/slurm_logs"
RUN = f"""rule train:
Job 1 has been submitted with SLURM jobid 11 (log: {LOGDIR}/rule_train/syn_topk_2_32_0/11.log).
rule train:
Job 2 has been submitted with SLURM jobid 12 (log: {LOGDIR}/rule_train/syn_topk_2_32_1/12.log).
rule table_t1:
Job 3 has been submitted with SLURM jobid 13 (log: {LOGDIR}/rule_table_t1/13.log).
localrule all:
"""


def row(jobid, comment, state="COMPLETED", exit_code="0:0", tres="cpu=1,mem=1000M,node=1"):
    return {"JobID": jobid, "State": state, "ExitCode": exit_code, "Account": "acc",
            "Partition": "debug", "AllocTRES": tres, "Comment": comment}  # fmt: skip


def fake_sacct(rows):
    return lambda ids: {r["JobID"]: r for r in rows if r["JobID"] in ids}


GOOD = [
    row("11", "rule_train_wildcards_syn_topk_2_32_0"),
    row("12", "rule_train_wildcards_syn_topk_2_32_1"),
    row("13", "rule_table_t1"),
]


def run_check(rows, run=RUN, gpu=(), local=("all",)):
    return check_sacct.check(run, DRY, "acc", "debug", set(gpu), set(local), fake_sacct(rows))


def test_parsers():
    assert check_sacct.dry_run_counts(DRY) == {"train": 2, "table_t1": 1, "all": 1}
    assert check_sacct.submitted_jobs(RUN) == [("train", "11"), ("train", "12"),
                                               ("table_t1", "13")]  # fmt: skip


def test_a_complete_run_passes():
    assert run_check(GOOD) == []


@pytest.mark.parametrize(
    "rows, needle",
    [
        (GOOD[:2], "Slurm job 13 is not in sacct"),
        ([GOOD[0], row("12", GOOD[1]["Comment"], state="TIMEOUT"), GOOD[2]], "TIMEOUT"),
        ([GOOD[0], row("12", GOOD[1]["Comment"], exit_code="1:0"), GOOD[2]], "exit 1:0"),
        ([GOOD[0], GOOD[1], row("13", "rule_table_t2")], "names another rule"),
        ([GOOD[0], GOOD[1], row("13", "rule_table_t1", tres="cpu=1,gres/gpu=1")], "holds a GPU"),
    ],
)
def test_each_kind_of_bad_job_is_reported(rows, needle):
    failures = run_check(rows)
    assert len(failures) == 1 and needle in failures[0], failures


def test_gpu_rules_must_hold_a_gpu():
    failures = run_check(GOOD, gpu=["train"])
    assert len(failures) == 2 and all("lacks a GPU" in f for f in failures)


def test_a_job_that_ran_outside_slurm_is_reported():
    run = RUN.replace("rule table_t1:\nJob 3 has been submitted with SLURM jobid 13 "
                      f"(log: {LOGDIR}/rule_table_t1/13.log).\n", "localrule table_t1:\n")  # fmt: skip
    failures = run_check(GOOD[:2], run=run)
    assert any("!= jobs of the DAG" in f for f in failures)
    assert any("rules run outside Slurm: ['table_t1']" in f for f in failures)
