"""The README's library example runs as written (on ref-tiny instead of SmolLM2, with shorter segments)."""

from __future__ import annotations

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace('"smollm2-135m"', '"ref-tiny"').replace("seq_len=256", "seq_len=64")
    code = code.replace("heldout_set(lm.tokenizer, 256,", "heldout_set(lm.tokenizer, 64,")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    radius, norm_gptq, norm_qaft, cos = (float(x) for x in capsys.readouterr().out.split()[-4:])
    assert radius > 0 and norm_gptq > 0 and norm_qaft > 0
    assert -1.0 <= cos <= 1.0 and not math.isnan(cos)
    top = list(namespace["top"])  # the Curvature object's Lanczos run: three eigenvalues, largest first
    assert len(top) == 3 and top == sorted(top, reverse=True)
    # the example's quantized models lie on the same lattice and the model was left at w0
    from landscape.quant import make_grid
    from landscape.weights import layer_weights

    w0 = layer_weights(namespace["lm"].model)
    for name, w in namespace["g"].weights.items():
        assert make_grid(w0[name], "int3").contains(w)
        assert make_grid(w0[name], "int3").contains(namespace["q"].weights[name])
