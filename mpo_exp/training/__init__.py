"""Lightning modules for the training stages: SFT (pi_ref) and DPO (pi_k)."""
