"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' projections driven to the identity."""
from barlowtwins.module import BarlowTwins, barlow_twins_loss, cross_correlation, off_diagonal

__all__ = ["BarlowTwins", "barlow_twins_loss", "cross_correlation", "off_diagonal"]
