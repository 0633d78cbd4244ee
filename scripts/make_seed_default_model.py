"""Write the seeded placeholder default model into exporter/default_model/.

A small random-weight GPTBigCode (MQA, gelu_pytorch_tanh) used until a trained default ships (issue 8).
Deterministic: the same seed gives the same bytes. Run: .venv/bin/python scripts/make_seed_default_model.py
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from exporter.config import GPTBigCodeConfig
from exporter.model import GPTBigCodeForCausalLM, init_weights

SEED = 20261126
CONFIG = GPTBigCodeConfig(
    vocab_size=1024, n_positions=256, n_embd=128, n_layer=2, n_head=4,
    bos_token_id=0, eos_token_id=0, pad_token_id=None,
)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = init_weights(GPTBigCodeForCausalLM(CONFIG), CONFIG, SEED)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {**CONFIG.to_dict(), "architectures": ["GPTBigCodeForCausalLM"], "torch_dtype": "float32"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "exporter" / "default_model")
