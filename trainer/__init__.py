"""The DreamBooth trainer (`dbtrain`): a slim loop over diffusers' UNet on dbkernels ops."""
