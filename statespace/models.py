"""PLACEHOLDER (being written): ready-made continuous-time model builders."""
