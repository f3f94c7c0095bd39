"""The ground floor: what every other floor stands on, and which imports no stage and no higher floor.

``config`` (strict YAML -> dataclasses), ``data`` (image sources; ``dataset_base`` their common base,
``tar_shards`` and ``hf_source`` the ``wds:`` and ``hf:`` ones, ``shard_writer`` what ``vqgpt shard``
writes), ``file_index`` (a folder's file list, built once and cached), ``tokens`` (token shards),
``images`` (image files and grids), ``files`` (writing a file whole), ``metrics`` (PSNR / SSIM),
``checkpoint`` (exports and resume checkpoints), ``fid`` (Inception features, FID / IS / precision /
recall).
"""
