# The plain-MoE baseline for config/train_gutenberg_mose.py: the same model and data, trained at full width only,
# for the same training compute (inherited: 3.0e13 FLOPs buy it 11,494 steps, 47.1M characters).
# python train.py config/train_gutenberg_moe.py
#
# The other baselines of the equal-compute comparison, as for Shakespeare (config/train_shakespeare_moe.py):
#   one dedicated MoE per operating point, each given MoSE's whole training compute:
#     --expert_hidden=96 --out_dir=out-gutenberg-moe-h96   (width 0.75: 13,590 steps), and likewise 64 (width 0.5,
#     16,622) and 32 (width 0.25, 21,395); that these lose to the full MoE is what makes this the regime where
#     width pays
#   the four sizes sharing MoSE's training compute, a quarter each (2,873 / 3,397 / 4,155 / 5,349 steps):
#     --max_train_flops=7.5e12 --expert_hidden=128 --out_dir=out-gutenberg-moe-q128, and likewise 96, 64, 32
# The 8e13 runs of the n_embd 128 shape (RESULTS.md, "Gutenberg: text read once") are the compute-starved point:
# their commands are in RESULTS.md.
exec(open('config/train_gutenberg_mose.py').read())
out_dir = 'out-gutenberg-moe'
width_sampling = 'none'
