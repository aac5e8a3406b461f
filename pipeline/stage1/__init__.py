"""Stage 1, `pipeline extract`: build a long-tailed dataset, train the backbone, write the feature cache.

  data, store      the long-tailed datasets, decoded once (the image store memory-maps them on later runs)
  shards           where each rank's block of the images lives and how a global batch reaches it
  augment          batched, per-sample augmentation on the training device
  models           the backbones (ResNet-32 for CIFAR, torchvision ResNets)
  distributed      torchrun: the process group, error agreement, SyncBatchNorm
  schedule         the learning-rate schedules;  precision: bf16 autocast and precision segments
  extract          the run:  plan (config, run folder) -> train (train_one_epoch, checkpoint, pause)
                   -> evaluate (features, BN re-estimation) -> write (the cache, pipeline/cache.py)

It meets stage 2 only through pipeline/cache.py.  Nothing heavy is imported here: `pipeline --help` reads
stage1.data's DATASETS without torch.
"""
