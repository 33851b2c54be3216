#!/bin/bash
set -e
cd /work/main
/usr/bin/time -f "SYNTH peak_kb %M wall %e" .venv/bin/python -m ctrkit synth synth.out_dir=/work/big/raw synth.rows=45000000 synth.valid_rows=100000 synth.test_rows=0 synth.files=24 synth.workers=2 --quiet --json > /work/big/synth.json
/usr/bin/time -f "PREPARE peak_kb %M wall %e" .venv/bin/python -m ctrkit prepare configs/deepfm_criteo_like.yaml "data.train=/work/big/raw/train-*.tsv" data.valid=/work/big/raw/valid.tsv data.prepared_dir=/work/big/prepared data.prepare_workers=2 --quiet --json > /work/big/prepare.json
/usr/bin/time -f "TRAIN peak_kb %M wall %e" .venv/bin/python -m ctrkit train configs/deepfm_criteo_like.yaml "data.train=/work/big/raw/train-*.tsv" data.valid=/work/big/raw/valid.tsv data.prepared_dir=/work/big/prepared data.prepare_workers=2 train.run_dir=/work/big/run train.max_steps=300 train.eval_every=100 train.progress=false --quiet --json > /work/big/train.json
