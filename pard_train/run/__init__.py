"""Run infrastructure layer: what any long run on one or many processes needs, whatever it trains.

Owns: ``distributed`` (accelerate/DeepSpeed set-up, clipping, replica check, shutdown), ``checkpoint`` (staged saves
with manifests, verify, resume, cadence, best), ``runlock`` (one live run per directory), ``run_record`` (the run
directory's identity, and the settings changed on a resume), ``sweep_dirs`` (one directory per multirun job),
``signals`` (SIGTERM/USR1/USR2), ``tracking`` (metrics.jsonl, TensorBoard, wandb, throughput and MFU),
``lr_schedule``, ``cli`` (one-line errors, exit 2, the Hydra frame).
May import: base, core, data, modelio.
"""
