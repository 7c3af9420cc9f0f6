"""Thin adapters from training frameworks to the worldpm_reward scoring verb."""
