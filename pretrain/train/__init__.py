"""pretrain/train"""
