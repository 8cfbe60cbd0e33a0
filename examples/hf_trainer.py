"""Probe the loss geometry of a Hugging Face Trainer run with one callback (seconds on a CPU, no download).

    python examples/hf_trainer.py [RUN_DIR]        # default runs/example-hf

A one-layer BERT classifier, randomly initialised from a config (nothing is downloaded), trains on random
token sequences. The callback draws its probe samples from the Trainer's train DataLoader (collated by its
data collator) and uses the model's own ``model(**batch).loss``.
"""

import os
import sys
import tempfile
import warnings

import torch
import transformers

import geomprobe as gp

run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/example-hf"
warnings.filterwarnings("ignore")  # the Trainer's notes about a CPU run
transformers.logging.set_verbosity_error()

torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16, num_labels=2)
model = transformers.BertForSequenceClassification(config)
rows = [{"input_ids": torch.randint(1, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
         "labels": int(torch.randint(0, 2, ()))} for _ in range(64)]

callback = gp.integrations.transformers.GeometryProbeCallback(
    run_dir=run_dir, force=True, metrics={"spectrum": {"k": 1}}, schedule=gp.every(5), probe_samples=16)
with tempfile.TemporaryDirectory() as scratch:   # the Trainer's own output folder, unused here
    args = transformers.TrainingArguments(output_dir=os.path.join(scratch, "hf"), max_steps=12,
                                          per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()

for r in gp.RunReader(run_dir).records:
    print(f"step {r['step']:3d}  loss {r['loss']:.4f}  λ_max {r['spectrum']['lambda_max']:.4f}"
          + ("  (end of training)" if r.get("final") else ""))
print(f"run written to {run_dir}; see it with: geomprobe report {run_dir}")
