"""Why the QTIP 2-bit cells of the IFEval study answer nothing: the first token after SmolLM2's
chat template, float vs QTIP 2-bit *without* fine-tuning (the shared 32 × 512 store), on the
first 8 prompts of the study's IFEval subset.  Output: empty_answers.txt (2026-12-03, one
thread, next to two other studies).

    python docs/results/ifeval-smollm2/empty_answers.py > docs/results/ifeval-smollm2/empty_answers.txt
"""

import torch

from q2lab import api
from q2lab.eval.generation import chat_prompt, encode_prompt, generate
from q2lab.eval.ifeval import load_ifeval
from q2lab.models import load_model

torch.set_num_threads(1)
items = load_ifeval("ifeval", sample=271, seed=0).items[:8]
for name in ("fp", "qtip"):
    lm = load_model("smollm2-135m")
    if name == "qtip":
        api.quantize(lm, "qtip", {"bits": 2}, windows=32, ctx=512)
    prompts = [chat_prompt(lm, it.prompt) for it in items]
    ids = torch.tensor([encode_prompt(lm, prompts[0])])
    with torch.no_grad():
        p = torch.softmax(lm.model(ids).logits[0, -1].float(), -1)
    top = torch.topk(p, 5)
    top5 = [(lm.tokenizer.decode([int(i)]), round(float(v), 3)) for v, i in zip(top.values, top.indices)]
    print(name, "first-token top5:", top5, "eos p", float(p[2]))
    for s in generate(lm, prompts, max_new_tokens=24, batch_size=8):
        print(name, s.n_new, s.hit_eos, repr(s.text[:80]))
