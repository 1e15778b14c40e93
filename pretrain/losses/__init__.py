"""pretrain/losses"""
