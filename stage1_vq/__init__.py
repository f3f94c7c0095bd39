"""stage1_vq package (being written)."""
