"""A 128-slice 256² CT volume (timing only): the aorta crop resampled (trilinear) to 128 × 256 × 256."""
import nibabel as nib, numpy as np, torch
from idm.io.medical import read_volume, write_nifti
v = read_volume("../shared/data/ct/totalsegmentator/aorta_report_ct_cropped/ct_cropped.nii.gz", modality="CT")
d = torch.nn.functional.interpolate(v.data[None, None].float(), size=(128, 256, 256), mode="trilinear", align_corners=False)[0, 0]
affine = v.meta["affine"].copy()
for axis, (old, new) in enumerate(zip(v.data.shape, (128, 256, 256))):
    affine[:3, axis] *= old / new
write_nifti("runs/volumes/aorta_128x256x256.nii.gz", d.numpy(), affine=affine)
print(v.data.shape, "->", tuple(d.shape))
