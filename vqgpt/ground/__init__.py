"""The ground floor: what every other floor stands on, and which imports no stage and no higher floor.

``config`` (strict YAML -> dataclasses), ``data`` (image sources), ``file_index`` (a folder's file
list, built once and cached), ``tokens`` (token shards),
``images`` (image files and grids), ``metrics`` (PSNR / SSIM), ``checkpoint`` (exports and resume
checkpoints), ``fid`` (Inception features, FID / IS / precision / recall).
"""
