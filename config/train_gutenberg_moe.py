# The plain-MoE baseline for config/train_gutenberg_mose.py: the same model and data, trained at full width only,
# for the same training compute (inherited: 8.0e13 FLOPs buy it 3,693 steps, 15.1M characters).
# python train.py config/train_gutenberg_moe.py
#
# The other baselines of the equal-compute comparison, as for Shakespeare (config/train_shakespeare_moe.py):
#   one dedicated MoE per operating point, each given MoSE's whole training compute (the half-size one decides
#   whether this compute is in the regime where the full MoE beats it):
#     --expert_hidden=128 --out_dir=out-gutenberg-moe-h128   (width 0.5: 4,338 steps), and likewise 192 (3,990)
#     and 64 (4,753)
#   the four sizes sharing MoSE's training compute, a quarter each (924 / 998 / 1,085 / 1,189 steps):
#     --max_train_flops=2e13 --expert_hidden=256 --out_dir=out-gutenberg-moe-q256, and likewise 192, 128, 64
exec(open('config/train_gutenberg_mose.py').read())
out_dir = 'out-gutenberg-moe'
width_sampling = 'none'
