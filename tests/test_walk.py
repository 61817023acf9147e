"""At run time, too, a token never leaves refqwen/model/: tools/walk.py's view of one forward pass."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("walk", Path(__file__).resolve().parent.parent / "tools" / "walk.py")
walk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(walk)


def test_one_forward_pass_stays_in_the_model_folder():
    model = walk.tiny_model(layers=1)
    model.forward([5, 17, 3])  # warm up, as the tool does
    everything = walk.walk(lambda: model.forward([5, 17, 3]), set())
    assert set(everything) <= {f"refqwen/model/{f}.py" for f in ("model", "config", "cache", "rope", "linear", "norm",
                                                                "attention", "mlp", "hooks", "ops")}, everything
    # stepping through the math: no trace hook, no backend method between a layer and its functions
    math = walk.walk(lambda: model.forward([5, 17, 3]), walk.TRACING | walk.PLUMBING)
    assert "refqwen/model/ops.py" not in math and "refqwen/model/hooks.py" not in math
    assert math[:1] == ["refqwen/model/model.py"] and math[-1] == "refqwen/model/model.py"
    # model.py -> norm.py -> model.py -> attention.py: the layer calls rms_norm directly, then attention
    i = math.index("refqwen/model/norm.py")
    assert math[i - 1:i + 3] == ["refqwen/model/model.py", "refqwen/model/norm.py", "refqwen/model/model.py",
                                 "refqwen/model/attention.py"]
