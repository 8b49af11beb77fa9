# The plain-MoE baseline for config/train_shakespeare_mose.py: the same model and data, trained at full width
# only, for the same training compute (inherited: 4.0e13 FLOPs buy it 1,887 steps).
# python train.py config/train_shakespeare_moe.py
#
# The other baselines of the equal-compute comparison (README, "results: does MoSE pay?"):
#   one dedicated MoE per operating point (the "oracle"), each given MoSE's whole training compute:
#     --expert_hidden=192 --out_dir=out-shakespeare-moe-h192   (width 0.75: 2,042 steps), and likewise 128 (0.5:
#     2,225) and 64 (0.25: 2,443)
#   the four sizes sharing MoSE's training compute, a quarter each (what one model per operating point would cost;
#   472 / 511 / 557 / 611 steps):
#     --max_train_flops=1e13 --expert_hidden=256 --out_dir=out-shakespeare-moe-q256, and likewise 192, 128, 64
exec(open('config/train_shakespeare_mose.py').read())
out_dir = 'out-shakespeare-moe'
width_sampling = 'none'
