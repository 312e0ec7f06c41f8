"""Studies run from a checkout of mmdet-dyhead; not part of the installed
package (see projects/README.md)."""
