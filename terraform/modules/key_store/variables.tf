variable "name" {
  type        = string
  description = "Deployment name: the bucket is <name>-keys-<suffix>, the KMS alias alias/<name>-keys."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  type        = string
  description = "Region of the bucket: the hosts may decrypt with the key only through S3 of this region."

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "host_role_name" {
  type        = string
  description = "IAM role of the GPU hosts: it may read the keys object (and decrypt it through S3), nothing else here."

  validation {
    condition     = length(var.host_role_name) > 0
    error_message = "host_role_name must name the hosts' IAM role."
  }
}

variable "object_key" {
  type        = string
  description = "Name of the hashed keys object in the bucket."
  default     = "keys.json"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$", var.object_key))
    error_message = "object_key must be path segments of letters, digits, '.', '_' and '-' separated by single slashes, such as keys.json."
  }
}

variable "noncurrent_version_expiration_days" {
  type        = number
  description = "Days an overwritten version of the key set is kept, to restore after a bad change."
  default     = 90

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && var.noncurrent_version_expiration_days <= 3650
    error_message = "noncurrent_version_expiration_days must be between 1 and 3650."
  }
}

variable "force_destroy" {
  type        = bool
  description = "Let `terraform destroy` (make destroy) delete the bucket with every version of the key set; false makes destroy stop until it is emptied by hand."
  default     = true
}

variable "kms_deletion_window_days" {
  type        = number
  description = "Days a destroyed key store's KMS key can still be recovered (AWS allows 7 to 30)."
  default     = 30

  validation {
    condition     = var.kms_deletion_window_days >= 7 && var.kms_deletion_window_days <= 30
    error_message = "kms_deletion_window_days must be between 7 and 30."
  }
}
