"""Image folders and the field's data sets in, protected image folders and perturbation files out."""
from .canonical import load_dataset, read_dataset
from .cifar import load_cifar_subset
from .decode import IMAGE_EXTENSIONS, display_path
from .exports import (
    atomic_write_bytes,
    load_delta_npy,
    load_poison_pt,
    read_json,
    save_delta_npy,
    save_poison_pt,
    write_json_atomic,
)
from .folders import (
    ImageSet,
    demo_dir,
    images_from_arrays,
    read_image_folder,
    write_image_folder,
)
from .scan import describe_left_out

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "atomic_write_bytes",
    "demo_dir",
    "describe_left_out",
    "display_path",
    "images_from_arrays",
    "load_cifar_subset",
    "load_dataset",
    "load_delta_npy",
    "load_poison_pt",
    "read_dataset",
    "read_image_folder",
    "read_json",
    "save_delta_npy",
    "save_poison_pt",
    "write_image_folder",
    "write_json_atomic",
]
