"""Training volumes for the 3D IDM (--chunk-depth): the CT training crops (aorta, pulmonary; 1.5 mm slices)
with every other axial slice (3 mm, the held-out example_ct's spacing). Not the held-out example_ct."""
from pathlib import Path
from idm.io.medical import read_volume, write_nifti
out = Path("runs/data/ct-volumes"); out.mkdir(parents=True, exist_ok=True)
for name in ("aorta_report_ct_cropped", "pulmonary_report_ct_cropped"):
    v = read_volume(f"../shared/data/ct/totalsegmentator/{name}/ct_cropped.nii.gz", modality="CT")
    affine = v.meta["affine"].copy(); affine[:3, 0] *= 2
    write_nifti(out / f"{name}_3mm.nii.gz", v.data[::2].numpy(), affine=affine)
    print(name, tuple(v.data.shape), "->", tuple(v.data[::2].shape), v.spacing)
