"""Print the surviving mutants of a cosmic-ray session: operator, line and the diff, one block each."""
import sys

from cosmic_ray.work_db import use_db
from cosmic_ray.work_item import TestOutcome

with use_db(sys.argv[1]) as db:
    total = killed = 0
    for item, result in db.completed_work_items:
        total += 1
        if result.test_outcome == TestOutcome.SURVIVED:
            for m in item.mutations:
                print(f"## {m.module_path}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}")
            print("\n".join(l for l in (result.diff or "").splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")))
        else:
            killed += 1
    print(f"# score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%)")
