"""Subprocess entry: compile the jobs given as JSON on stdin (on as many emulated devices as XLA_FLAGS asks for) and
print their results as one JSON line. Started by ``_compile.run_jobs``; not a public command."""
import json
import sys

from jdist.analysis.plan._compile import compile_job, job_from_dict


def main() -> int:
  jobs = [job_from_dict(raw) for raw in json.loads(sys.stdin.read())]
  print(json.dumps([compile_job(job) for job in jobs]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
