output "vm_name" {
  description = "Name of the GPU VM."
  value       = google_compute_instance.vm.name
}

output "ssh_command" {
  description = "SSH into the VM through IAP (no public IP; OS Login decides who may)."
  value       = "gcloud compute ssh ${google_compute_instance.vm.name} --zone ${var.zone} --project ${var.project_id} --tunnel-through-iap"
}

output "bucket_url" {
  description = "The DVC remote bucket."
  value       = "gs://${google_storage_bucket.dvc.name}"
}

output "dvc_remote_add" {
  description = "Run once in the repository to make the bucket the default DVC remote."
  value       = "dvc remote add --default --force gcs gs://${google_storage_bucket.dvc.name}/dvc"
}

output "service_account_email" {
  description = "The VM's service account (object access on the bucket only)."
  value       = google_service_account.vm.email
}
