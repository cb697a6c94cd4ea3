"""Orthogonal transforms shared by rotation-based methods (QuIP#, QTIP, SpinQuant)."""
