"""placeholder until isae.fidelity lands"""
