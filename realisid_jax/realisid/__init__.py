"""RealisID, the method (Sun et al., arXiv 2412.16832), in one folder:

  ops.py          crop_and_resize, relocate (R), location_mask (c_loc): jitted, boxes are data   (Eqs. 3-5)
  branches.py     ``RealisID``: local_branch + global_branch + ID projection, K persons          (Eqs. 3-6)
  conditions.py   per-person host conditions (reference crop, landmark image c_pe, box) and the sheet
  objective.py    the face-weighted diffusion loss and condition dropout                         (Eq. 7)
  components.py   ``Components``: the frozen SDXL / SD 1.5 base + the branches, one NNX module
  pipeline.py     ``RealisIDPipeline``: three-way guidance with delayed ID conditioning          (Eq. 8)
"""
