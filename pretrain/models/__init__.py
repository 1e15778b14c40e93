"""pretrain/models"""
