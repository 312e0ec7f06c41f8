from .task_attn_bbox_head import TaskAttnBBoxHead

__all__ = ['TaskAttnBBoxHead']
