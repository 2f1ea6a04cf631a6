"""`tgserve quantize`: write a GPTQ or AWQ checkpoint (Hugging Face layout) from a float one, offline on CPU.

calibration.py (the text, user's or built in), source.py (what can be quantized; refusals before any
work), affine.py (the group min/max integer form both methods share), gptq.py and awq.py (the two
algorithms on one linear / one decoder layer), layerwise.py (the decoder layers run one by one on the
calibration activations), packing.py (AutoGPTQ's and AutoAWQ's tensor layouts), writer.py (the output
folder, written beside OUT_DIR and renamed at the end), cli.py (the subcommand).
"""
