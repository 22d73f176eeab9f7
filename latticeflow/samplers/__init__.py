"""Markov-chain samplers (HMC baseline, neural MCMC) and the driver that writes their output."""
