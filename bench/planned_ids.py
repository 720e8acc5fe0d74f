"""Every stage's artifact id of a recipe with the code version fixed (no stage is run):
    PYTHONPATH=<tree>/src python planned_ids.py RECIPE [field=default ...]
Fields given are dropped from a stage's id config when they hold that default (fields that
later features added), to compare the id the same config gives on two code trees."""
import json, sys
from types import SimpleNamespace
from pathlib import Path
import stillhouse.artifacts as A
import stillhouse.runner as R
drop = dict(a.split("=", 1) for a in sys.argv[2:])
real = A.artifact_id
def fixed(kind, stage, config, parents, code_version=None):
    config = {k: v for k, v in config.items() if not (k in drop and json.dumps(v) == drop[k])}
    return real(kind, stage, config, parents, code_version="fixed")
R.artifact_id = fixed
from stillhouse.recipe import load_recipe
r = R.Runner(load_recipe(Path(sys.argv[1])), Path("/tmp/qsbench/unused-ws"))
out = {}
for name in r.recipe.order():
    aid, cfg, parents = r._key(name)
    r.results[name] = SimpleNamespace(id=aid, path=Path("/nonexistent") / name)
    out[name] = aid
print(json.dumps(out))
