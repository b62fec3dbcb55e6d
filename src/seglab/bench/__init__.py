"""Where the time of a training run goes on this machine: `python -m seglab.bench` (make bench).

    python -m seglab.bench [--size N] [--repeats N] [--steps N] [--out bench.json] [--quick]
                           [--only SECTION ...] [overrides ...]

Sections, each a median over --repeats:
  data      images/s of one DataLoader worker at --data-size (513) with the train augmentation, masks
            rasterised from COCO every time vs read from the mask cache; ms per augmentation step
  masks     masks/s rasterised from polygon, compressed-RLE and uncompressed-RLE annotations
  loop      s/step of Lightning's training loop vs a plain PyTorch loop (same model, batches, optimizer,
            precision; same process, interleaved step by step), and host syncs per step in each
  model     train and inference images/s: eager fp32, channels_last, bf16-mixed (CUDA), torch.compile
  evaluate  s/image of seglab.evaluate.evaluate on a checkpoint written by the loop section
  fit       time-to-result: a real `seglab.train.train` run (the project's Trainer, callbacks, logger) of
            --fit-epochs over a synthetic export of large JPEGs: wall time, time inside training steps and
            their share, images/s end to end, data waits per epoch, per-epoch costs (validation, metrics,
            image panels, checkpoint, early stopping), the image cache's effect on feeding an epoch, and
            the bare-model ceiling (same network, batch, precision; data already on the device)

Everything runs on a synthetic dataset written to a temporary folder, with the project's own config
(conf/train.yaml); trailing Hydra overrides change it, e.g. `augmentation.train.3.noise_scale_factor=1`.
"""
