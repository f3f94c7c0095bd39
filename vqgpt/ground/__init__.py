"""The ground floor: what every other floor stands on, and which imports no stage and no higher floor.

``config`` (strict YAML -> dataclasses), ``data`` (image sources), ``tokens`` (token shards),
``images`` (image files and grids), ``metrics`` (PSNR / SSIM), ``checkpoint`` (exports and resume
checkpoints), ``fid`` (Inception features, FID / IS / precision / recall).
"""
