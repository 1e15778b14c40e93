"""pretrain/data"""
