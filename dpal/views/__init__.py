"""View sets as data: every random decision of docs/method.md section 3 is sampled once into a float32
record, and the pixels are a pure, batched function of (image, background, record).

The teacher is run on exactly what ``render_view_sets`` returns, and the trainer calls the same function
on the same records to rebuild the same pixels; a cached target is never flipped or re-cropped.

The package, one module per concern:

- ``records``: the record layout (field names in order, their offsets, the named views ``CropFields`` and
  ``ViewSetFields``), the version check;
- ``sampling``: drawing records from a generator;
- ``crops``: crop boxes (torchvision's RandomResizedCrop on each image's own size), resize and blur matrices;
- ``colour``: the colour ops with per-sample factors, normalization;
- ``staging``: images packed into one pixel buffer, plans staged into one byte buffer;
- ``render``: plans made on the host and executed on the device, and the render calls.
"""
from dpal.views.colour import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, blur_kernel_size,
                               denormalize, grayscale, normalize, solarize)
from dpal.views.crops import apply_separable, blur_weights, crop_boxes, crop_tries, resize_weights
from dpal.views.records import (CROP_BLOCK_FIELDS, CROP_BLOCK_NAMES, CROP_TRIES, LOCAL_CROP_BLOCK, LOCAL_CROP_FIELD_NAMES,
                                LOCAL_CROP_FIELDS, STALE_VIEW_RECORDS, VIEW_PARAMS_VERSION, VIEW_SET_FIELD_NAMES,
                                VIEW_SET_FIELDS, CropFields, ViewParamsError, ViewSetFields, background_indices,
                                check_view_params)
from dpal.views.render import (RenderedViews, RenderPlan, execute_local_crops, execute_view_sets, pack_view_set_images,
                               paste_persons, plan_local_crops, plan_view_sets, render_crops, render_local_crops,
                               render_view_sets)
from dpal.views.sampling import sample_local_crops, sample_view_sets
from dpal.views.staging import PackedImages, StagedTensors, pack_images, to_rgb_uint8

__all__ = [
    "CROP_BLOCK_FIELDS", "CROP_BLOCK_NAMES", "CROP_TRIES", "LOCAL_CROP_BLOCK", "LOCAL_CROP_FIELDS",
    "LOCAL_CROP_FIELD_NAMES", "STALE_VIEW_RECORDS", "VIEW_PARAMS_VERSION", "VIEW_SET_FIELDS", "VIEW_SET_FIELD_NAMES",
    "CropFields", "PackedImages", "RenderPlan", "RenderedViews", "StagedTensors", "ViewParamsError", "ViewSetFields",
    "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "apply_separable", "background_indices",
    "blur_kernel_size", "blur_weights", "check_view_params", "crop_boxes", "crop_tries", "denormalize",
    "execute_local_crops", "execute_view_sets", "grayscale", "normalize", "pack_images", "pack_view_set_images",
    "paste_persons", "plan_local_crops", "plan_view_sets", "render_crops", "render_local_crops", "render_view_sets",
    "resize_weights", "sample_local_crops", "sample_view_sets", "solarize", "to_rgb_uint8",
]
