"""The README's API example: prepare, one training step, generate with AnchorCache, read its stats."""

import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import anllm
from anllm.models.smollm2 import smollm2_path

path = smollm2_path()  # HF checkpoint dir (cached)
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
tok = AutoTokenizer.from_pretrained(path)
model, tok = anllm.prepare_model(model, tok, mode="ac")  # adds <AC>, init from "."; AnSAN from now on

# A training step: <AC> after every sentence (a real splitter), the mask is applied by the model.
text = anllm.insert_anchor_token("Anchors carry the sentence. The rest can go. That saves memory.")
print(text)
batch = tok([text], return_tensors="pt")
loss = model(**batch, labels=batch["input_ids"]).loss
loss.backward()
print(f"loss {loss.item():.3f}")

# Generation with the pruned cache: the same scores as a full cache under the AnSAN mask.
# (Untrained, <AC> and "." have identical embeddings, so their logits tie: compare scores, not tokens.)
model.eval()
kw = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
with torch.no_grad():
    cache = anllm.AnchorCache()  # keep_prefix=True keeps the prompt ("Src Cache")
    out = model.generate(**batch, past_key_values=cache, **kw)
    full = model.generate(**batch, past_key_values=DynamicCache(), **kw)
print(tok.decode(out.sequences[0]))
print("max |score diff| at step 0:", (out.scores[0] - full.scores[0]).abs().max().item())
print(cache.stats())  # seen, kept, max_kept, reduction (C⇓), bytes, ...

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    model2, tok2 = anllm.from_pretrained(d)  # anchor settings come back from config.json
    print(anllm.get_anchor_config(model2))
